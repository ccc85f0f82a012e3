"""Every query of the Grafana dashboard returns data from a real Prometheus scraping a real tssc server.

A tiny seeded model is served by uvicorn on loopback with small cache budgets (a hot window of 2, a
cold tier of a few dozen checkpoints, a disk tier), so that a short multi-turn load produces hot hits,
cold hits, disk hits and evictions; a second replica sharing its real redis-server (the remote tier)
then continues two of its sessions, which gives remote hits. Prometheus (the Debian binary) scrapes it every second. Then
each dashboard expression, with the dashboard's variables resolved the way Grafana resolves them
(through their own label_values queries), is evaluated over the test's time range through the HTTP
API: each one must return at least one series with a finite value.

Skipped only when the prometheus binary is missing outside CI; in CI (CI set) that is a failure.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.dashboard_queries import (
    grafana_regex,
    iter_targets,
    label_values_query,
    load_dashboard,
    query_variables,
    require_binary,
    resolve_datasources,
    substitute,
    variable_query,
)
from tests.integration.server_proc import (
    ServerProc,
    free_port,
    make_tiny_model,
    start_server,
    stop_process,
    wait_until_ok,
)
from tests.redis_proc import redis_server

pytestmark = pytest.mark.slow

SCRAPE_SECONDS = 1
TURNS = 3
SESSIONS = 4
CACHE_FLAGS = [
    "--hot-window", "2",
    "--hot-bytes", "64KiB",
    "--cold-bytes", "256KiB",
    "--disk-bytes", "4MiB",
    "--checkpoint-interval", "16",
]  # fmt: skip


@dataclass(frozen=True)
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def query(self, path: str, **params: Any) -> Any:
        response = httpx.get(self.url + path, params=params, timeout=10)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]


@contextlib.contextmanager
def _run_prometheus(target_ports: list[int], workdir: Path) -> Iterator[Prometheus]:
    binary = require_binary("prometheus", "prometheus")
    config = workdir / "prometheus.yml"
    scrape = {
        "job_name": "tssc",
        "metrics_path": "/metrics",
        "static_configs": [{"targets": [f"127.0.0.1:{port}" for port in target_ports]}],
    }
    interval = f"{SCRAPE_SECONDS}s"
    config.write_text(json.dumps({"global": {"scrape_interval": interval}, "scrape_configs": [scrape]}))
    port = free_port()
    cmd = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with (workdir / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    prom = Prometheus(url=f"http://127.0.0.1:{port}", proc=proc)
    try:
        wait_until_ok(proc, prom.url + "/-/ready", workdir / "prometheus.log", timeout=30.0)
        yield prom
    finally:
        stop_process(proc)


def _chat(client: httpx.Client, session: str, messages: list[dict[str, str]]) -> str:
    body = {"model": "model", "messages": messages, "max_tokens": 8, "temperature": 0}
    response = client.post("/v1/chat/completions", headers={"X-Session-ID": session}, json=body)
    assert response.status_code == 200, response.text
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def _first_message(s: int) -> list[dict[str, str]]:
    """Every session opens with the same system prompt: later sessions resume from the first one's
    checkpoint of it (a `shared` hit)."""
    system = {"role": "system", "content": "You are a terse assistant who answers in one line."}
    return [system, {"role": "user", "content": f"Hello number {s}, how are you today?"}]


def _conversation(client: httpx.Client, s: int) -> None:
    """A multi-turn session: a miss on the first turn, then hot hits."""
    messages = _first_message(s)
    for turn in range(TURNS):
        reply = _chat(client, f"s{s}", messages)
        messages += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": f"Tell me more about {turn} please."},
        ]


def _edit(client: httpx.Client, s: int, scraped: Callable[[], None]) -> None:
    """Session s regenerated, then its second message edited: both resume from checkpoints the hot
    window has left (cold or disk); a scrape in between, so each tier's series is seen rising."""
    first = _first_message(s)
    reply = _chat(client, f"s{s}", first)
    scraped()
    _chat(
        client,
        f"s{s}",
        [*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "Else."}],
    )
    scraped()


def _drive_load(srv: ServerProc, prom: Prometheus) -> None:
    """Sessions, then edits, each followed by a scrape, as under steady traffic: a series that one
    step creates is seen rising by a later one (rate() over a series born at its final value is 0)."""
    with httpx.Client(base_url=srv.base_url, timeout=60) as client:
        for s in range(SESSIONS):
            _conversation(client, s)
            _wait_until_scraped(prom, srv)
        for s in reversed(range(SESSIONS)):
            _edit(client, s, lambda: _wait_until_scraped(prom, srv))


def _continue_elsewhere(other: ServerProc, prom: Prometheus) -> None:
    """Sessions continued on the second replica, which never saw them: restored from the remote tier."""
    with httpx.Client(base_url=other.base_url, timeout=60) as client:
        for s in range(2):
            _chat(client, f"s{s}", _first_message(s))
            _wait_until_scraped(prom, other)
    assert _server_total(other, "tssc_state_cache_lookups_total", result="remote_hit") >= 1


def _server_total(srv: ServerProc, sample: str, **labels: str) -> float:
    """Sum of the server's own `/metrics` samples named `sample` whose labels include `labels`."""
    text = httpx.get(srv.base_url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and labels.items() <= s.labels.items()
    )


def _assert_load_did_its_job(srv: ServerProc) -> None:
    for result in ("hot_hit", "cold_hit", "miss"):
        assert _server_total(srv, "tssc_state_cache_lookups_total", result=result) > 0, f"no {result}"
    assert _server_total(srv, "tssc_state_cache_evictions_total") > 0, "no eviction"


def _wait_until_scraped(prom: Prometheus, srv: ServerProc, timeout: float = 30.0) -> None:
    """Until Prometheus' latest sample of the token counter equals the server's (load is over)."""
    expected = _server_total(srv, "tssc_generation_tokens_total")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        query = f'sum(tssc_generation_tokens_total{{instance="127.0.0.1:{srv.port}"}})'
        result = prom.query("/api/v1/query", query=query)["result"]
        if result and float(result[0]["value"][1]) == expected:
            return
        time.sleep(SCRAPE_SECONDS / 4)
    raise TimeoutError(f"prometheus never saw tssc_generation_tokens_total={expected}")


def _wait_for_scrapes(prom: Prometheus, count: int, timeout: float = 60.0) -> None:
    """Until Prometheus has scraped the server successfully `count` times (its first scrape only
    comes after target discovery settles, several seconds after start)."""
    query = 'min(sum_over_time(up{job="tssc"}[5m]))'
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = prom.query("/api/v1/query", query=query)["result"]
        if result and float(result[0]["value"][1]) >= count:
            return
        time.sleep(SCRAPE_SECONDS / 2)
    raise TimeoutError(f"prometheus did not scrape the server {count} times in {timeout} s")


def _resolve_variables(prom: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each variable's value as Grafana sets it: the datasource at its default (the provisioned
    Prometheus, which this test's Prometheus stands for); the others for "All", their label_values
    query's values (sent to that datasource), regex-joined."""
    values = resolve_datasources(dashboard)
    for variable in query_variables(dashboard):
        _assert_reads_the_datasource(variable, values)
        selector, label = label_values_query(substitute(variable_query(variable), values))
        series = prom.query("/api/v1/series", **{"match[]": selector, "start": time.time() - 600})
        found = sorted({s[label] for s in series if label in s})
        assert found, f"variable {variable['name']}: {selector} has no {label} values"
        values[variable["name"]] = grafana_regex(*found)
    return values


def _assert_reads_the_datasource(item: dict[str, Any], values: dict[str, str]) -> None:
    """A query variable or panel query goes to the Prometheus the datasource variable selects (this one)."""
    assert substitute(item["datasource"]["uid"], values) == values["datasource"], item["datasource"]


def _finite_points(result: list[dict[str, Any]]) -> int:
    return sum(1 for series in result for _, v in series["values"] if math.isfinite(float(v)))


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, float, float]]:
    """A Prometheus that scraped a server through the whole load: (prometheus, start, end)."""
    require_binary("prometheus", "prometheus")
    work = tmp_path_factory.mktemp("dashboard-prometheus")
    model = make_tiny_model(work / "model")
    with contextlib.ExitStack() as stack:
        rds = stack.enter_context(redis_server(work))
        flags = ["--model", str(model), *CACHE_FLAGS, "--remote-url", rds.url]
        srv = stack.enter_context(start_server([*flags, "--disk-dir", str(work / "disk")], log_dir=work))
        other = stack.enter_context(start_server(flags, log_dir=work))  # a second replica
        prom = stack.enter_context(_run_prometheus([srv.port, other.port], work))
        start = time.time()
        _wait_for_scrapes(prom, 3)  # samples before the load, so rates see the counters rise
        _drive_load(srv, prom)
        _assert_load_did_its_job(srv)
        _continue_elsewhere(other, prom)
        time.sleep(2 * SCRAPE_SECONDS)  # a few scrapes after the last change
        yield prom, start, time.time()


def test_every_dashboard_query_returns_data(scraped: tuple[Prometheus, float, float]) -> None:
    prom, start, end = scraped
    dashboard = load_dashboard()
    values = _resolve_variables(prom, dashboard)
    empty = []
    for panel, target in iter_targets(dashboard):
        _assert_reads_the_datasource(target, values)
        expr = substitute(target["expr"], values)
        data = prom.query("/api/v1/query_range", query=expr, start=start, end=end, step=SCRAPE_SECONDS)
        if _finite_points(data["result"]) == 0:
            empty.append(f"{panel['title']} [{target['refId']}]: {expr}")
    assert empty == [], "queries without data:\n" + "\n".join(empty)


def test_panels_show_what_their_titles_claim(scraped: tuple[Prometheus, float, float]) -> None:
    """Spot checks of label sets: per-tier panels split by tier, hits by tier include hot and cold."""
    prom, start, end = scraped
    dashboard = load_dashboard()
    values = _resolve_variables(prom, dashboard)

    def series_labels(title: str, label: str) -> set[str]:
        found: set[str] = set()
        for panel, target in iter_targets(dashboard):
            if panel["title"] == title:
                expr = substitute(target["expr"], values)
                data = prom.query(
                    "/api/v1/query_range", query=expr, start=start, end=end, step=SCRAPE_SECONDS
                )
                found |= {s["metric"].get(label, "") for s in data["result"] if _finite_points([s])}
        return found

    assert series_labels("Occupancy vs capacity per tier", "tier") == {"hot", "cold", "disk", "remote"}
    assert {"hot", "cold", "remote"} <= series_labels("Hit ratio by tier", "tier")
    assert {"hot", "cold", "remote"} <= series_labels("Fetch latency by tier (p50 / p95 / p99)", "tier")
    assert {"written", "read"} == series_labels("Remote tier traffic", "direction")
    assert {"cached", "computed"} == series_labels("Prompt tokens: reused vs computed", "source")
    assert "never_saved" in series_labels("Misses by cause", "cause")
    assert {"session", "shared"} <= series_labels("Hits by scope: own session or shared", "scope")
