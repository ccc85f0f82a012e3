"""Generate the tssc Grafana dashboard (deploy/grafana/dashboards/tssc.json) from code.

    python deploy/grafana/build_dashboard.py           # (re)write the committed JSON
    python deploy/grafana/build_dashboard.py --check   # exit 1 if the committed JSON is stale

Plain Python, no Grafana SDK. Every panel, query and variable reads the Prometheus datasource that
the `datasource` variable selects; its default is the one deploy/grafana/provisioning/datasources/
prometheus.yml provisions (uid `DATASOURCE_UID`), and a Grafana without it falls back to its default
Prometheus, so the JSON imports anywhere. Two chained variables select what is shown: `model` (from
the `tssc_model_info` info metric) and `instance` (the instances serving that model); every query
filters on `instance`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARD_UID = "tssc-overview"
DATASOURCE_UID = "tssc-prometheus"  # the provisioned datasource: the variable's default
DATASOURCE_VARIABLE = "datasource"
DATASOURCE: dict[str, str] = {"type": "prometheus", "uid": "${" + DATASOURCE_VARIABLE + "}"}
OUTPUT = Path(__file__).resolve().parent / "dashboards" / "tssc.json"
GRID_WIDTH = 24

SEL = 'instance=~"$instance"'  # the label selector every query carries
RATE = "$__rate_interval"
CACHED = 'source="cached"'
COMPUTED = 'source="computed"'
HITS = 'result=~".+_hit"'
MISSES = 'result="miss"'
QUANTILES: tuple[tuple[str, str], ...] = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel, with its legend."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class Panel:
    """A panel before layout: `width` in grid columns (of 24), `height` in grid rows."""

    title: str
    description: str
    targets: tuple[Target, ...]
    unit: str = "short"
    kind: str = "timeseries"  # timeseries | stat | bargauge
    width: int = 12
    height: int = 8
    stacked: bool = False
    max_value: float | None = None

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"panel {self.title!r} has no query")
        if not 0 < self.width <= GRID_WIDTH:
            raise ValueError(f"panel {self.title!r}: width must be in 1..{GRID_WIDTH}")


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


# ---- PromQL helpers ---------------------------------------------------------------------------


def _sel(extra: str = "") -> str:
    return "{" + SEL + (", " + extra if extra else "") + "}"


def _rate(metric: str, extra: str = "") -> str:
    return f"rate({metric}{_sel(extra)}[{RATE}])"


def _quantiles(histogram: str, by: str = "") -> tuple[Target, ...]:
    """p50/p95/p99 of a histogram, aggregated over instances (and split `by` a label if given)."""
    group = f"le, {by}" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return tuple(
        Target(
            f"histogram_quantile({q}, sum by ({group}) ({_rate(histogram + '_bucket')}))",
            f"{prefix}{name}",
        )
        for q, name in QUANTILES
    )


# ---- panels -----------------------------------------------------------------------------------


def _overview_row() -> Row:
    return Row(
        "Overview",
        (
            Panel(
                "Generated tokens/s",
                "Completion tokens produced per second, all requests.",
                (Target(f"sum({_rate('tssc_generation_tokens_total')})", "tokens/s"),),
                unit="short",
                kind="stat",
                width=6,
                height=4,
            ),
            Panel(
                "Prompt tokens reused",
                "Share of prompt tokens served from a state checkpoint instead of being prefilled.",
                (
                    Target(
                        f"sum({_rate('tssc_prompt_tokens_total', CACHED)})"
                        f" / sum({_rate('tssc_prompt_tokens_total')})",
                        "reused",
                    ),
                ),
                unit="percentunit",
                kind="stat",
                width=6,
                height=4,
                max_value=1.0,
            ),
            Panel(
                "Cache hit ratio",
                "Share of cache lookups that found a checkpoint in any tier.",
                (
                    Target(
                        f"sum({_rate('tssc_state_cache_lookups_total', HITS)})"
                        f" / sum({_rate('tssc_state_cache_lookups_total')})",
                        "hit ratio",
                    ),
                ),
                unit="percentunit",
                kind="stat",
                width=6,
                height=4,
                max_value=1.0,
            ),
            Panel(
                "Sessions",
                "Sessions (conversations) the state cache holds checkpoints for.",
                (Target(f"sum(tssc_sessions{_sel()})", "sessions"),),
                kind="stat",
                width=6,
                height=4,
            ),
        ),
    )


def _cache_capacity_row() -> Row:
    return Row(
        "State cache: occupancy",
        (
            Panel(
                "Occupancy vs capacity per tier",
                "Bytes of checkpoints held in each tier (hot = VRAM FP8, cold = pinned RAM FP16, disk, "
                "remote = the Redis tier all replicas share, as of each replica's last write) against the "
                "tier's byte budget. Occupancy never exceeds capacity.",
                (
                    Target(f"sum by (tier) (tssc_state_cache_bytes{_sel()})", "{{tier}} used"),
                    Target(
                        f"sum by (tier) (tssc_state_cache_capacity_bytes{_sel()})",
                        "{{tier}} capacity",
                    ),
                ),
                unit="bytes",
                width=12,
            ),
            Panel(
                "Tier fill",
                "Occupancy as a fraction of each enabled tier's budget.",
                (
                    Target(
                        f"sum by (tier) (tssc_state_cache_bytes{_sel()})"
                        f" / (sum by (tier) (tssc_state_cache_capacity_bytes{_sel()}) > 0)",
                        "{{tier}}",
                    ),
                ),
                unit="percentunit",
                kind="bargauge",
                width=6,
                max_value=1.0,
            ),
            Panel(
                "Checkpoints per tier",
                "Number of state checkpoints held in each tier.",
                (Target(f"sum by (tier) (tssc_state_cache_checkpoints{_sel()})", "{{tier}}"),),
                width=6,
            ),
            Panel(
                "Attention KV per tier (hybrid models)",
                "Bytes of attention KV blocks that hybrid (Mamba2 + attention) checkpoints hold in each tier, "
                "part of the occupancy above; a conversation's checkpoints share their KV prefix, stored once "
                "(in Redis too: remote, as of the replica's last write). Zero for a pure Mamba model.",
                (Target(f"sum by (tier) (tssc_state_cache_kv_bytes{_sel()})", "{{tier}}"),),
                unit="bytes",
                width=12,
            ),
        ),
    )


def _cache_traffic_row() -> Row:
    return Row(
        "State cache: hits, misses, fetches, evictions",
        (
            Panel(
                "Hit ratio by tier",
                "Share of lookups served by each tier (hot, cold, disk, remote); the rest are misses.",
                (
                    Target(
                        "label_replace(sum by (result) "
                        f"({_rate('tssc_state_cache_lookups_total', HITS)})"
                        f" / ignoring (result) group_left () sum({_rate('tssc_state_cache_lookups_total')}),"
                        ' "tier", "$1", "result", "(.+)_hit")',
                        "{{tier}}",
                    ),
                ),
                unit="percentunit",
                width=6,
                max_value=1.0,
            ),
            Panel(
                "Hits by scope: own session or shared",
                "Lookups per second that restored a checkpoint, by scope: `session` (one the requesting "
                "conversation already used) or `shared` (one another conversation created, e.g. a common "
                "system prompt): how much reuse crosses conversations.",
                (
                    Target(
                        f"sum by (scope) ({_rate('tssc_state_cache_lookups_total', HITS)})",
                        "{{scope}}",
                    ),
                ),
                unit="reqps",
                width=6,
                stacked=True,
            ),
            Panel(
                "Misses by cause",
                "Lookups that found no usable checkpoint, per second, by the reason the cache gives.",
                (
                    Target(
                        f"sum by (cause) ({_rate('tssc_state_cache_lookups_total', MISSES)})",
                        "{{cause}}",
                    ),
                ),
                unit="reqps",
                width=6,
                stacked=True,
            ),
            Panel(
                "Evictions by tier",
                "Checkpoints evicted per second from each tier to stay within its byte budget.",
                (Target(f"sum by (tier) ({_rate('tssc_state_cache_evictions_total')})", "{{tier}}"),),
                unit="ops",
                width=6,
                stacked=True,
            ),
            Panel(
                "Fetch latency by tier (p50 / p95 / p99)",
                "Lookup-to-live-slot time of a restore, by the tier that served it.",
                _quantiles("tssc_state_cache_fetch_seconds", by="tier"),
                unit="s",
                width=12,
            ),
            Panel(
                "Capture latency (p50 / p95 / p99)",
                "Time to copy a live slot's state into a checkpoint.",
                _quantiles("tssc_state_cache_capture_seconds"),
                unit="s",
                width=12,
            ),
            Panel(
                "Remote tier traffic",
                "Checkpoint bytes per second written to the shared Redis tier (message ends, prompt ends, "
                "finishes) and read from it (a session continued on a replica that did not hold it).",
                (
                    Target(
                        f"sum by (direction) ({_rate('tssc_state_cache_remote_bytes_total')})",
                        "{{direction}}",
                    ),
                ),
                unit="Bps",
                width=12,
            ),
            Panel(
                "Remote tier errors by kind",
                "Failed or skipped remote operations per second. None fails a request: the replica serves "
                "from its local tiers and backs off (`unavailable` counts calls skipped meanwhile).",
                (
                    Target(
                        f"sum by (kind) ({_rate('tssc_state_cache_remote_errors_total')})",
                        "{{kind}}",
                    ),
                ),
                unit="ops",
                width=12,
                stacked=True,
            ),
        ),
    )


def _tokens_row() -> Row:
    return Row(
        "Prompt tokens and throughput",
        (
            Panel(
                "Prompt tokens: reused vs computed",
                "Prompt tokens per second served from a checkpoint (cached) against those prefilled "
                "(computed). A follow-up turn should be mostly cached.",
                (Target(f"sum by (source) ({_rate('tssc_prompt_tokens_total')})", "{{source}}"),),
                unit="short",
                width=12,
                stacked=True,
            ),
            Panel(
                "Tokens/s",
                "Generated tokens and prefilled prompt tokens per second.",
                (
                    Target(f"sum({_rate('tssc_generation_tokens_total')})", "generated"),
                    Target(
                        f"sum({_rate('tssc_prompt_tokens_total', COMPUTED)})",
                        "prefilled",
                    ),
                ),
                unit="short",
                width=12,
            ),
        ),
    )


def _latency_row() -> Row:
    return Row(
        "Latency",
        (
            Panel(
                "Time to first token (p50 / p95 / p99)",
                "Arrival of a request to its first generated token: queueing + restore + prefill.",
                _quantiles("tssc_time_to_first_token_seconds"),
                unit="s",
                width=8,
            ),
            Panel(
                "Inter-token latency (p50 / p95 / p99)",
                "Time between consecutive generated tokens of a request (decode step time).",
                _quantiles("tssc_inter_token_latency_seconds"),
                unit="s",
                width=8,
            ),
            Panel(
                "Queue time (p50 / p95 / p99)",
                "Arrival to admission into a live slot.",
                _quantiles("tssc_request_queue_seconds"),
                unit="s",
                width=8,
            ),
            Panel(
                "Where time to first token goes (mean per request, by phase)",
                "Consecutive phases of a request before its first token: parse (body read and validated), "
                "tokenize (chat template, tokenizer), queue (waiting for a live slot), restore (checkpoint "
                "lookup and fetch into the slot), prefill (prompt tokens computed, chunked across steps, until the "
                "first token is sampled and on the host), first_token (from there to its delivery). Stacked, "
                "they add up to the server-side TTFT.",
                (
                    Target(
                        f"sum by (phase) ({_rate('tssc_request_phase_seconds_sum')})"
                        f" / sum by (phase) ({_rate('tssc_request_phase_seconds_count')})",
                        "{{phase}}",
                    ),
                ),
                unit="s",
                width=12,
                stacked=True,
            ),
            Panel(
                "Phase p95",
                "95th percentile of each phase of time to first token (see the panel beside).",
                (
                    Target(
                        "histogram_quantile(0.95, sum by (le, phase) "
                        f"({_rate('tssc_request_phase_seconds_bucket')}))",
                        "{{phase}}",
                    ),
                ),
                unit="s",
                width=12,
            ),
        ),
    )


def _load_row() -> Row:
    return Row(
        "Load and memory",
        (
            Panel(
                "Running and waiting requests",
                "Requests holding a live slot (running) and requests queued for one (waiting).",
                (
                    Target(f"sum(tssc_requests_running{_sel()})", "running"),
                    Target(f"sum(tssc_requests_waiting{_sel()})", "waiting"),
                ),
                width=8,
            ),
            Panel(
                "Finished requests by reason",
                "Requests finished per second: stop, length, or abort (client gone).",
                (
                    Target(
                        f"sum by (finish_reason) ({_rate('tssc_requests_total')})",
                        "{{finish_reason}}",
                    ),
                ),
                unit="reqps",
                width=8,
                stacked=True,
            ),
            Panel(
                "Sessions",
                "Sessions the state cache holds checkpoints for.",
                (Target(f"sum(tssc_sessions{_sel()})", "sessions"),),
                width=8,
            ),
            Panel(
                "GPU memory",
                "CUDA memory allocated and reserved by the server, and the device total (0 on CPU).",
                (Target(f"sum by (kind) (tssc_gpu_memory_bytes{_sel()})", "{{kind}}"),),
                unit="bytes",
                width=12,
            ),
            Panel(
                "Process memory",
                "Resident host memory of the server process (includes the cold tier's pinned RAM).",
                (Target(f"sum by (instance) (process_resident_memory_bytes{_sel()})", "{{instance}}"),),
                unit="bytes",
                width=12,
            ),
        ),
    )


ROWS: tuple[Row, ...] = (
    _overview_row(),
    _cache_capacity_row(),
    _cache_traffic_row(),
    _tokens_row(),
    _latency_row(),
    _load_row(),
)


# ---- JSON rendering ---------------------------------------------------------------------------


def _field_config(panel: Panel) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "min": 0, "color": {"mode": "palette-classic"}}
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stacked else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
        }
    overrides: list[dict[str, Any]] = []
    if any(t.legend.endswith("capacity") for t in panel.targets):
        overrides.append(
            {
                "matcher": {"id": "byRegexp", "options": ".* capacity"},
                "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}}],
            }
        )
    return {"defaults": defaults, "overrides": overrides}


def _options(panel: Panel) -> dict[str, Any]:
    if panel.kind == "stat":
        reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
        return {"reduceOptions": reduce, "colorMode": "value", "graphMode": "area", "textMode": "auto"}
    if panel.kind == "bargauge":
        reduce = {"calcs": ["lastNotNull"], "fields": "", "values": False}
        return {"reduceOptions": reduce, "orientation": "horizontal", "displayMode": "gradient"}
    return {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    }


def _targets(panel: Panel) -> list[dict[str, Any]]:
    return [
        {
            "refId": chr(ord("A") + i),
            "datasource": dict(DATASOURCE),
            "expr": t.expr,
            "legendFormat": t.legend or "__auto",
            "range": True,
            "instant": False,
            "editorMode": "code",
        }
        for i, t in enumerate(panel.targets)
    ]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": dict(DATASOURCE),
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": _field_config(panel),
        "options": _options(panel),
        "targets": _targets(panel),
    }


def _layout(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Rows and their panels, placed left to right, wrapping at 24 columns."""
    out: list[dict[str, Any]] = []
    panel_id, y = 1, 0
    for row in rows:
        out.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id, y, x, line_height = panel_id + 1, y + 1, 0, 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            out.append(_panel_json(panel, panel_id, x, y))
            panel_id, x, line_height = panel_id + 1, x + panel.width, max(line_height, panel.height)
        y += line_height
    return out


def _datasource_variable() -> dict[str, Any]:
    """Which Prometheus every panel reads: any of the Grafana's, the provisioned one by default."""
    return {
        "type": "datasource",
        "name": DATASOURCE_VARIABLE,
        "label": "Data source",
        "query": "prometheus",
        "current": {"selected": True, "text": "Prometheus", "value": DATASOURCE_UID},
        "refresh": 1,
        "includeAll": False,
        "multi": False,
        "regex": "",
        "hide": 0,
        "options": [],
    }


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": dict(DATASOURCE),
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable-query"},
        "refresh": 2,  # on time-range change: new instances appear without a reload
        "includeAll": True,
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "regex": "",
        "hide": 0,
        "options": [],
    }


def build_dashboard() -> dict[str, Any]:
    """The dashboard as a JSON-ready dict."""
    return {
        "uid": DASHBOARD_UID,
        "title": "tssc: tiered SSM state cache",
        "description": "Serving and state-cache health of tssc servers (generated by build_dashboard.py).",
        "tags": ["tssc", "mamba", "inference"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "timezone": "browser",
        "templating": {
            "list": [
                _datasource_variable(),
                _variable("model", "Model", "label_values(tssc_model_info, model)"),
                _variable("instance", "Instance", 'label_values(tssc_model_info{model=~"$model"}, instance)'),
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": _layout(ROWS),
    }


def render() -> str:
    """The dashboard JSON text exactly as committed (sorted keys, 2-space indent, final newline)."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            sys.stderr.write(f"{args.output} is stale: run python deploy/grafana/build_dashboard.py\n")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
