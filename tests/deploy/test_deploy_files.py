"""docker-compose.yml, the k8s manifests, the Prometheus and Grafana configuration, and the Dockerfile,
checked by real parsers (Compose v2, kubernetes-validate's schemas, promtool, BuildKit's Dockerfile
parser) and against the app: every path they probe exists as a route of `server.api.create_app`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import dockerfile
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from server.api import create_app
from server.settings import parse_settings
from tests.deploy.dashboard_queries import REPO, require_binary
from tests.deploy.deploy_files import (
    K8S_VERSION,
    PROMETHEUS_YML,
    assert_settings_env,
    bind_mounts,
    compose_binary,
    compose_config,
    k8s,
    k8s_bytes,
    k8s_documents,
    published_ports,
    servers,
    setting_bytes,
)

DASHBOARD_PROVIDERS = REPO / "deploy" / "grafana" / "provisioning" / "dashboards"


class AppRoutes:
    """`path in routes`: the real app answers a GET on `path` with anything but 404. Its lifespan is
    not started, so no model is loaded: /health then says 503, the not-ready answer probes rely on."""

    def __init__(self) -> None:
        self._client = TestClient(create_app(parse_settings([])))
        assert self._client.get("/no-such-path").status_code == 404

    def __contains__(self, path: object) -> bool:
        return isinstance(path, str) and self._client.get(path).status_code != 404


@pytest.fixture(scope="module")
def app_paths() -> AppRoutes:
    return AppRoutes()


def test_health_is_503_until_the_model_is_loaded_and_metrics_answers() -> None:
    client = TestClient(create_app(parse_settings([])))
    assert client.get("/health").status_code == 503
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "tssc_state_cache_bytes" in metrics.text


# ---- docker-compose.yml ---------------------------------------------------------------------


def test_compose_file_is_valid_for_each_profile() -> None:
    assert set(compose_config()["services"]) == {"prometheus", "grafana"}
    assert set(compose_config("gpu")["services"]) == {"tssc", "prometheus", "grafana"}
    assert set(compose_config("cpu")["services"]) == {"tssc-cpu", "prometheus", "grafana"}
    scale = {"tssc-a", "tssc-b", "redis", "nginx", "prometheus", "grafana"}
    assert set(compose_config("scale")["services"]) == scale


@pytest.mark.parametrize(("profile", "server"), [("cpu", "tssc-cpu"), ("gpu", "tssc")])
def test_compose_each_profile_starts_exactly_one_server(profile: str, server: str) -> None:
    """`docker compose --profile cpu up -d` (no service names) starts one server, so no two bind 8000."""
    for config in (compose_config(profile), compose_config(env={"COMPOSE_PROFILES": profile})):
        services = config["services"]
        assert servers(services) == [server]
        ports = published_ports(services)
        assert len(ports) == len(set(ports)) and "8000" in ports, ports


def test_compose_rejects_an_invalid_file(tmp_path: Path) -> None:
    """The validator above can fail: an unknown service key is an error."""
    bad = tmp_path / "docker-compose.yml"
    bad.write_text("services:\n  x:\n    image: busybox\n    gpus_please: 1\n")
    result = subprocess.run([compose_binary(), "-f", str(bad), "config", "--quiet"], capture_output=True)
    assert result.returncode != 0


def test_compose_server_reserves_a_gpu_and_the_cpu_profile_does_not() -> None:
    services = compose_config("gpu", "cpu")["services"]
    assert services["tssc"]["profiles"] == ["gpu"]
    (device,) = services["tssc"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["tssc"]["build"]["args"]["VARIANT"] == "cuda"
    assert "TORCH_CUDA_ARCH_LIST" in services["tssc"]["build"]["args"]
    cpu = services["tssc-cpu"]
    assert cpu["profiles"] == ["cpu"] and "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert "tssc" in cpu["networks"]["default"]["aliases"]
    for name in ("tssc", "tssc-cpu"):
        assert_settings_env(set(services[name]["environment"]))


def test_compose_named_volumes_hold_the_hf_cache_and_the_disk_tier() -> None:
    config = compose_config("gpu", "cpu")
    assert {"hf-cache", "disk-tier"} <= set(config["volumes"])
    for name in ("tssc", "tssc-cpu"):
        service = config["services"][name]
        mounts = {v["source"]: v["target"] for v in service["volumes"] if v["type"] == "volume"}
        assert mounts["disk-tier"] == service["environment"]["TSSC_DISK_DIR"]
        assert mounts["hf-cache"] == service["environment"]["HF_HOME"]


@pytest.mark.parametrize("profile", ["gpu", "cpu", "scale"])
def test_compose_prometheus_finds_each_server_of_the_profile(profile: str, app_paths: AppRoutes) -> None:
    """The tssc job discovers servers by DNS: every server of every profile answers to one of its names."""
    services = compose_config(profile)["services"]
    assert bind_mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == PROMETHEUS_YML
    scrape = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "tssc"]
    assert job["metrics_path"] in app_paths
    (dns,) = job["dns_sd_configs"]
    assert dns["type"] == "A"
    for name in servers(services):
        service = services[name]
        network = (service.get("networks") or {}).get("default") or {}
        assert {name, *network.get("aliases", [])} & set(dns["names"]), name
        assert dns["port"] == int(service["environment"]["TSSC_PORT"])
    (instance,) = job["relabel_configs"]
    assert instance["source_labels"] == ["__meta_dns_name"] and instance["target_label"] == "instance"
    assert instance["replacement"] == f"${{1}}:{dns['port']}"
    assert any(p["target"] == 9090 for p in services["prometheus"]["ports"])


def test_compose_grafana_mounts_the_provisioning_and_dashboards() -> None:
    grafana = compose_config()["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == REPO / "deploy" / "grafana" / "provisioning"
    (provider,) = yaml.safe_load((DASHBOARD_PROVIDERS / "tssc.yml").read_text())["providers"]
    dashboards_in_container = provider["options"]["path"]
    assert mounts[dashboards_in_container] == REPO / "deploy" / "grafana" / "dashboards"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (mounts[dashboards_in_container] / Path(home).name).is_file()
    assert any(p["target"] == 3000 for p in grafana["ports"])


def test_prometheus_config_passes_promtool() -> None:
    promtool = require_binary("promtool", "prometheus")
    result = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Kubernetes -------------------------------------------------------------------------------


def test_k8s_manifests_validate_against_the_kubernetes_schema() -> None:
    docs = k8s_documents()
    kinds = {"Deployment", "Service", "ConfigMap", "Ingress", "PodDisruptionBudget"}
    assert {d["kind"] for d in docs} >= kinds
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validator_rejects_an_unknown_field() -> None:
    deployment = k8s("Deployment", "tssc")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_k8s_probes_and_scrape_annotations_name_real_routes(app_paths: AppRoutes) -> None:
    deployment = k8s("Deployment", "tssc")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in app_paths, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    for scrape in (
        deployment["spec"]["template"]["metadata"]["annotations"],
        k8s("Service", "tssc")["metadata"]["annotations"],
    ):
        assert scrape["prometheus.io/scrape"] == "true"
        assert scrape["prometheus.io/path"] in app_paths
        assert scrape["prometheus.io/port"] == k8s("ConfigMap")["data"]["TSSC_PORT"]


def test_k8s_deployment_wires_gpu_config_and_disk_tier() -> None:
    deployment = k8s("Deployment", "tssc")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["securityContext"]["runAsNonRoot"] is True
    config = k8s("ConfigMap")
    assert_settings_env(set(config["data"]))
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    disk = volumes[mounts[config["data"]["TSSC_DISK_DIR"]]]
    # one per pod (a ReadWriteOnce claim cannot serve N replicas), and larger than the disk budget:
    # the kubelet evicts a pod whose emptyDir outgrows its sizeLimit
    assert k8s_bytes(disk["emptyDir"]["sizeLimit"]) > setting_bytes(config["data"]["TSSC_DISK_BYTES"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(config["data"]["TSSC_PORT"])
    assert (
        k8s("Service", "tssc")["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


# ---- Dockerfile -------------------------------------------------------------------------------


def _dockerfile() -> tuple[Any, ...]:
    return tuple(dockerfile.parse_file(str(REPO / "Dockerfile")))


def _final_stage() -> list[Any]:
    commands = _dockerfile()
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return list(commands[last_from:])


def test_dockerfile_bases_are_build_args_or_earlier_stages() -> None:
    """No base image is hard-coded: each FROM is a global ARG or an earlier stage, for both variants."""
    commands = _dockerfile()
    first_from = [c.cmd for c in commands].index("FROM")
    global_args = {c.value[0].split("=")[0] for c in commands[:first_from] if c.cmd == "ARG"}
    assert {"VARIANT", "CUDA_DEVEL_IMAGE", "CUDA_RUNTIME_IMAGE", "CPU_BASE_IMAGE"} <= global_args
    stages: list[str] = []
    for command in (c for c in commands if c.cmd == "FROM"):
        base, alias = command.value[0], command.value[2]
        arg = base.removeprefix("${").removesuffix("}")
        for variant in ("cpu", "cuda"):
            assert arg in global_args or base.replace("${VARIANT}", variant) in stages, base
        stages.append(alias)
    assert stages[-1] == "final"
    assert {"base-cpu", "base-cuda", "build-cpu", "build-cuda"} <= set(stages)


def test_dockerfile_kernels_follow_torch_cuda_arch_list() -> None:
    commands = _dockerfile()
    text = " ".join(c.original for c in commands)
    assert any(c.cmd == "ARG" and c.value[0].startswith("TORCH_CUDA_ARCH_LIST=") for c in commands)
    assert "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}" in text
    assert "build_kernels.py" in text and "MAMBA_SSM_SPEC" in text and "CAUSAL_CONV1D_SPEC" in text


def test_dockerfile_runs_as_non_root_with_a_health_check_on_a_real_route(app_paths: AppRoutes) -> None:
    final = _final_stage()
    (user,) = [c.value[0] for c in final if c.cmd == "USER"]
    assert user not in {"root", "0"}
    (health,) = [c for c in final if c.cmd == "HEALTHCHECK"]
    assert "/health" in health.original and "/health" in app_paths
    env = dict(v.split("=", 1) for c in final if c.cmd == "ENV" for v in _env_pairs(c))
    assert_settings_env(set(env))
    exposed = [c.value[0] for c in final if c.cmd == "EXPOSE"]
    assert exposed == [env["TSSC_PORT"]]
    (entrypoint,) = [c for c in final if c.cmd == "ENTRYPOINT"]
    (cmd,) = [c for c in final if c.cmd == "CMD"]
    assert list(entrypoint.value) + list(cmd.value) == ["tssc", "serve", "--host", "0.0.0.0"]


def _env_pairs(command: Any) -> list[str]:
    values = list(command.value)
    return [f"{values[i]}={values[i + 1]}" for i in range(0, len(values), 2)]


def test_dockerignore_keeps_the_context_to_the_package_sources() -> None:
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    rules = [ln for ln in lines if ln and not ln.startswith("#")]
    assert rules[0] == "*", "the context starts from nothing"
    allowed = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    copied = [
        Path(src).as_posix()
        for command in _dockerfile()
        if command.cmd == "COPY" and not any(f.startswith("--from") for f in command.flags)
        for src in command.value[:-1]
    ]
    assert copied
    for src in copied:
        assert any(src == a or src.startswith(a + "/") for a in allowed), src
    assert {".venv", "tests", ".git", "bench"}.isdisjoint(allowed)
