"""Scale-out deployment (issue #15): the compose `scale` profile and the k8s manifests for N replicas.

The router they put in front of the replicas, deploy/nginx/tssc.conf, has its own tests
(test_router.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.deploy.deploy_files import (
    K8S,
    assert_settings_env,
    bind_mounts,
    compose_config,
    flag_value,
    k8s,
    k8s_bytes,
    k8s_documents,
    published_ports,
    redis_bytes,
    servers,
    setting_bytes,
)
from tests.nginx_conf import ROUTER_CONF, router_conf, seconds

REPLICAS = ["tssc-a", "tssc-b"]
GATEWAY_API = K8S / "gateway-api"


# ---- docker-compose.yml: the scale profile ----------------------------------------------------


@pytest.mark.parametrize("env", [None, {"COMPOSE_PROFILES": "scale"}])
def test_compose_scale_profile_runs_two_replicas_behind_the_router(env: dict[str, str] | None) -> None:
    services = compose_config(*([] if env else ["scale"]), env=env)["services"]
    assert servers(services) == REPLICAS
    assert all("ports" not in services[name] for name in REPLICAS), "only the router is published"
    ports = published_ports(services)
    assert len(ports) == len(set(ports)) and "8080" in ports, ports
    (port,) = services["nginx"]["ports"]
    assert router_conf().one("server").one("listen").args == (str(port["target"]),)


def test_compose_replicas_share_redis_and_keep_their_own_disk_tier() -> None:
    services = compose_config("cpu", "scale")["services"]
    disks = set()
    for name in REPLICAS:
        replica, env = services[name], services[name]["environment"]
        assert_settings_env(set(env))
        assert env["TSSC_DEVICE"] == "cpu" and replica["build"] == services["tssc-cpu"]["build"]
        url = urlsplit(env["TSSC_REMOTE_URL"])
        assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, "/0")
        assert "redis" in replica["depends_on"]
        mounts = {v["target"]: v["source"] for v in replica["volumes"] if v["type"] == "volume"}
        disks.add(mounts[env["TSSC_DISK_DIR"]])
    assert len(disks) == len(REPLICAS), "a disk tier is one process's directory"
    assert "TSSC_REMOTE_URL" not in services["tssc-cpu"]["environment"], "no Redis outside `scale`"


def test_compose_redis_is_a_cache_that_evicts_only_keys_with_a_ttl() -> None:
    services = compose_config("scale")["services"]
    command = services["redis"]["command"]
    assert flag_value(command, "--save") == "" and flag_value(command, "--appendonly") == "no"
    assert flag_value(command, "--maxmemory-policy") == "volatile-lru"
    for name in REPLICAS:
        budget = setting_bytes(services[name]["environment"]["TSSC_REMOTE_BYTES"])
        assert redis_bytes(flag_value(command, "--maxmemory")) > budget


def test_compose_router_mounts_the_conf_that_names_the_replicas() -> None:
    services = compose_config("scale")["services"]
    nginx = services["nginx"]
    assert bind_mounts(nginx)["/etc/nginx/conf.d/default.conf"] == ROUTER_CONF
    assert set(nginx["depends_on"]) == set(REPLICAS)
    upstream = router_conf().one("upstream", "tssc")
    named = {d.args[0] for d in upstream.all("server")}
    assert named == {f"{n}:{services[n]['environment']['TSSC_PORT']}" for n in REPLICAS}


# ---- Kubernetes ----------------------------------------------------------------------------------


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _secret_env(container: dict[str, Any], name: str) -> dict[str, Any]:
    (env,) = [e for e in container["env"] if e["name"] == name]
    return dict(env["valueFrom"]["secretKeyRef"])


def test_k8s_replicas_share_the_redis_tier() -> None:
    deployment, config = k8s("Deployment", "tssc"), k8s("ConfigMap")["data"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    url = urlsplit(config["TSSC_REMOTE_URL"])
    (port,) = k8s("Service", url.hostname)["spec"]["ports"]
    assert url.scheme == "redis" and url.port == port["port"]
    password = _secret_env(_container(deployment), "TSSC_REMOTE_PASSWORD")
    assert password.pop("optional") is True, "a Redis without a password needs no Secret"
    assert password == _secret_env(_container(k8s("Deployment", url.hostname)), "REDIS_PASSWORD")


def test_k8s_redis_is_a_cache_that_evicts_only_keys_with_a_ttl() -> None:
    config = k8s("ConfigMap")["data"]
    (redis,) = [d for d in k8s_documents() if d["kind"] == "Deployment" and d["metadata"]["name"] != "tssc"]
    container = _container(redis)
    args = container["args"]
    assert flag_value(args, "--save") == "" and flag_value(args, "--appendonly") == "no"
    assert flag_value(args, "--maxmemory-policy") == "volatile-lru"
    assert flag_value(args, "--requirepass") == "$(REDIS_PASSWORD)"
    maxmemory = redis_bytes(flag_value(args, "--maxmemory"))
    assert setting_bytes(config["TSSC_REMOTE_BYTES"]) < maxmemory
    assert maxmemory < k8s_bytes(container["resources"]["limits"]["memory"])


def test_k8s_ingress_hashes_the_session_header_onto_the_service() -> None:
    ingress = k8s("Ingress")
    annotations = {
        k.removeprefix("nginx.ingress.kubernetes.io/"): v
        for k, v in ingress["metadata"]["annotations"].items()
    }
    assert annotations["upstream-hash-by"] == "$http_x_session_id"
    assert annotations["proxy-buffering"] == "off"
    location = router_conf().one("server").one("location", "/")
    assert int(annotations["proxy-read-timeout"]) >= seconds(location.one("proxy_read_timeout").args[0])
    assert "proxy-next-upstream" not in annotations, "its hash balancer would retry the same pod"
    (rule,) = ingress["spec"]["rules"]
    (path,) = rule["http"]["paths"]
    backend = path["backend"]["service"]
    service = k8s("Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}


def test_k8s_disruption_budget_covers_the_tssc_pods() -> None:
    budget = k8s("PodDisruptionBudget")
    labels = k8s("Deployment", "tssc")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_gateway_api_examples_route_to_the_service_and_hash_the_session_header() -> None:
    """Not applied with deploy/k8s/ (they need CRDs the validator has no schema for): cross-checked here."""
    docs = {d["kind"]: d for path in GATEWAY_API.glob("*.yaml") for d in yaml.safe_load_all(path.read_text())}
    assert not {d["kind"] for d in k8s_documents()} & set(docs)
    service = k8s("Service", "tssc")
    (rule,) = docs["HTTPRoute"]["spec"]["rules"]
    (backend,) = rule["backendRefs"]
    assert backend == {"name": service["metadata"]["name"], "port": service["spec"]["ports"][0]["port"]}
    assert rule["timeouts"]["request"] == "0s", "no limit on a stream's length"
    policy = docs["BackendTrafficPolicy"]["spec"]
    (target,) = policy["targetRefs"]
    assert (target["kind"], target["name"]) == ("HTTPRoute", docs["HTTPRoute"]["metadata"]["name"])
    assert policy["loadBalancer"]["consistentHash"]["header"]["name"] == "X-Session-ID"
    rule_istio = docs["DestinationRule"]["spec"]
    assert rule_istio["host"] == service["metadata"]["name"]
    assert rule_istio["trafficPolicy"]["loadBalancer"]["consistentHash"]["httpHeaderName"] == "X-Session-ID"
