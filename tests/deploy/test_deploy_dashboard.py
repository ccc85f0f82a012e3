"""The generated Grafana dashboard: up to date, structurally valid, and every query parses in promtool."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.metrics import Metrics
from tests.deploy.dashboard_queries import (
    DASHBOARD_DIR,
    DASHBOARD_JSON,
    GRAFANA,
    datasource_refs,
    datasource_variable,
    exposed_names,
    grafana_regex,
    iter_panels,
    iter_targets,
    label_values_query,
    load_dashboard,
    load_generator,
    metric_names,
    query_variables,
    referenced_variables,
    require_binary,
    resolve_datasources,
    substitute,
    variable_query,
    variables,
)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def _provisioned_datasource_uids() -> set[str]:
    uids = set()
    for path in (GRAFANA / "provisioning" / "datasources").glob("*.y*ml"):
        for source in yaml.safe_load(path.read_text())["datasources"]:
            uids.add(source["uid"])
    return uids


def _all_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [target["expr"] for _, target in iter_targets(dashboard)]
    exprs += [label_values_query(variable_query(v))[0] for v in query_variables(dashboard)]
    return exprs


def test_committed_json_is_the_generators_output(tmp_path: Path) -> None:
    generator = load_generator()
    assert DASHBOARD_JSON.read_text() == generator.render(), "run: python deploy/grafana/build_dashboard.py"
    assert generator.main(["--check"]) == 0
    stale = tmp_path / "stale.json"
    stale.write_text("{}\n")
    assert generator.main(["--check", "--output", str(stale)]) == 1


def test_uids_and_panel_ids_are_unique(dashboard: dict[str, Any]) -> None:
    dashboards = [load_dashboard(p) for p in sorted(DASHBOARD_DIR.glob("*.json"))]
    uids = Counter(d["uid"] for d in dashboards)
    assert dashboard["uid"] and max(uids.values()) == 1, uids
    ids = Counter(p["id"] for p in iter_panels(dashboard))
    assert [i for i, n in ids.items() if n > 1] == []
    for panel in iter_panels(dashboard):
        ref_ids = [t["refId"] for t in panel.get("targets", [])]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_panels_fit_the_grid_without_overlap(dashboard: dict[str, Any]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_every_datasource_reference_is_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """No hard-coded uid: imported into any Grafana, every panel reads the Prometheus the variable selects."""
    panels = [p for p in iter_panels(dashboard) if p["type"] != "row"]
    assert panels and all("datasource" in p for p in panels)
    for ref in datasource_refs(dashboard):
        assert ref == {"type": "prometheus", "uid": "${datasource}"}, ref


def test_the_datasource_variable_defaults_to_the_provisioned_prometheus(dashboard: dict[str, Any]) -> None:
    variable = datasource_variable(dashboard)
    assert (variable["name"], variable["query"]) == ("datasource", "prometheus")
    assert not variable["multi"] and not variable["includeAll"]
    assert variable["current"]["value"] in _provisioned_datasource_uids()
    for ref in datasource_refs(dashboard):
        assert substitute(ref["uid"], resolve_datasources(dashboard)) in _provisioned_datasource_uids()


def test_every_variable_is_used(dashboard: dict[str, Any]) -> None:
    used = set()
    for _, target in iter_targets(dashboard):
        used |= referenced_variables(target["expr"])
    for variable in query_variables(dashboard):
        used |= referenced_variables(variable_query(variable))
    for ref in datasource_refs(dashboard):
        used |= referenced_variables(ref["uid"])
    names = {v["name"] for v in variables(dashboard)}
    assert names == {"datasource", "model", "instance"}
    assert names <= used, f"unused variables: {names - used}"
    assert used - names <= {"__rate_interval", "__interval", "__range"}, f"undefined: {used - names}"


def test_every_query_filters_on_the_instance_variable(dashboard: dict[str, Any]) -> None:
    for panel, target in iter_targets(dashboard):
        selectors = target["expr"].count("{")
        assert selectors and target["expr"].count('instance=~"$instance"') == selectors, panel["title"]


def test_every_metric_referenced_exists_in_server_metrics(dashboard: dict[str, Any]) -> None:
    exposed = exposed_names(Metrics().registry)
    referenced = set().union(*(metric_names(e) for e in _all_exprs(dashboard)))
    assert "tssc_state_cache_fetch_seconds_bucket" in referenced
    assert sorted(referenced - exposed) == []


def test_required_panels_are_present(dashboard: dict[str, Any]) -> None:
    exprs = " ".join(t["expr"] for _, t in iter_targets(dashboard))
    for metric in (
        "tssc_state_cache_bytes",
        "tssc_state_cache_capacity_bytes",
        "tssc_state_cache_kv_bytes",
        "tssc_state_cache_fetch_seconds_bucket",
        "tssc_state_cache_lookups_total",
        "tssc_state_cache_evictions_total",
        "tssc_prompt_tokens_total",
        "tssc_time_to_first_token_seconds_bucket",
        "tssc_inter_token_latency_seconds_bucket",
        "tssc_generation_tokens_total",
        "tssc_requests_running",
        "tssc_requests_waiting",
        "tssc_sessions",
        "tssc_gpu_memory_bytes",
    ):
        assert metric in exprs, metric
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, tier) (rate(tssc_state_cache_fetch" in exprs


def test_every_expression_parses_in_promtool(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = require_binary("promtool", "prometheus")
    values = {"instance": grafana_regex("127.0.0.1:8000", "tssc:8000"), "model": grafana_regex("demo-mamba2")}
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr, values)}
        for i, expr in enumerate(_all_exprs(dashboard))
    ]
    rules_file = tmp_path / "rules.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_promtool_rejects_a_broken_expression(tmp_path: Path) -> None:
    """The promtool check above can fail: a malformed query is reported."""
    promtool = require_binary("promtool", "prometheus")
    rules_file = tmp_path / "rules.yml"
    broken = {"record": "dashboard:broken", "expr": "sum by (tier) (rate(x[$__rate_interval])"}
    rules_file.write_text(json.dumps({"groups": [{"name": "g", "rules": [broken]}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True)
    assert result.returncode != 0
