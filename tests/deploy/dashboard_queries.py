"""Helpers shared by the dashboard tests: read the dashboard, list its queries, fill in variables.

Not a test module (no `test_` prefix); tests import it as `tests.deploy.dashboard_queries`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GRAFANA = REPO / "deploy" / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
DASHBOARD_JSON = DASHBOARD_DIR / "tssc.json"
GENERATOR = GRAFANA / "build_dashboard.py"

# Grafana's built-in interval variables and what the tests put in their place.
BUILTIN_VARIABLES: dict[str, str] = {"__rate_interval": "30s", "__interval": "5s", "__range": "5m"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{")
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


def load_generator() -> ModuleType:
    """deploy/grafana/build_dashboard.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("tssc_build_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def load_dashboard(path: Path = DASHBOARD_JSON) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows and the panels folded inside collapsed rows included."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def iter_targets(dashboard: Mapping[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of every panel."""
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    return list(dashboard.get("templating", {}).get("list", []))


def query_variables(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The variables whose values come from a PromQL `label_values` query."""
    return [v for v in variables(dashboard) if v.get("type") == "query"]


def datasource_variable(dashboard: Mapping[str, Any]) -> dict[str, Any]:
    """The one variable of type `datasource`: which Prometheus every panel and query reads."""
    (variable,) = [v for v in variables(dashboard) if v.get("type") == "datasource"]
    return variable


def datasource_refs(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every datasource reference: of the panels, of their queries and of the query variables."""
    refs = [p["datasource"] for p in iter_panels(dashboard) if "datasource" in p]
    refs += [t["datasource"] for _, t in iter_targets(dashboard)]
    return refs + [v["datasource"] for v in query_variables(dashboard)]


def resolve_datasources(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """The datasource variable at its default (the provisioned Prometheus), as `substitute` takes it."""
    variable = datasource_variable(dashboard)
    return {variable["name"]: str(variable["current"]["value"])}


def variable_query(variable: Mapping[str, Any]) -> str:
    query = variable.get("query", "")
    return str(query.get("query", "") if isinstance(query, Mapping) else query)


def label_values_query(query: str) -> tuple[str, str]:
    """`label_values(SELECTOR, LABEL)` -> (SELECTOR, LABEL)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query)
    assert match, f"not a label_values(selector, label) query: {query!r}"
    return match[1].strip(), match[2]


def referenced_variables(text: str) -> set[str]:
    return {a or b for a, b in _VARIABLE.findall(_drop_regex_groups(text))}


def _drop_regex_groups(text: str) -> str:
    # `$1` in label_replace's replacement is a regex group, not a Grafana variable.
    return re.sub(r"\$\d+", "", text)


def grafana_regex(*values: str) -> str:
    """What Grafana puts in place of a multi-value variable inside `=~"..."`: escaped values, `|`-joined.

    Regex metacharacters get a backslash, itself doubled because the value lands in a PromQL string.
    """
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with Grafana's variables replaced: `values` for the dashboard's, test intervals for built-ins."""
    table = {**BUILTIN_VARIABLES, **values}

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        return table.get(name, match[0])

    return _VARIABLE.sub(replace, expr)


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (every selector in the dashboard carries `{...}`)."""
    return set(_SELECTOR.findall(_STRING.sub('""', expr)))


def exposed_names(registry: Any) -> set[str]:
    """Sample names a prometheus_client registry exposes, by metric type (even before any sample)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
        "stateset": ("",),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def require_binary(name: str, package: str) -> str:
    """Path of `name`; outside CI a missing binary skips the test, in CI (CI set) it fails it."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} not installed (Debian package: {package})"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI must install it")
    pytest.skip(message)
