"""deploy/kubernetes: every manifest is well formed and wired together (selectors, ports,
probes, GPU requests, the ConfigMap), and every container's args, once Kubernetes has
substituted ``$(VAR)``, are accepted by the real ``disagg serve`` / ``disagg-proxy`` parsers.

``kubectl apply --dry-run=client`` runs too when a cluster answers (kubectl needs its API
server even for a client-side dry run); ``kubernetes-validate`` checks the schemas when it is
installed. The structural checks here run everywhere.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML: installed with transformers (a dependency of disagg)
from deploy_plan import REPO_ROOT

from disagg.cli import build_parser, engine_config_from_args
from proxy.launcher import parse_args as parse_proxy_args
from proxy.launcher import proxy_config

K8S = REPO_ROOT / "deploy" / "kubernetes"
POD_IP = "10.244.1.7"
"""What ``status.podIP`` gives the test pod."""
GPU_RESOURCES = ("amd.com/gpu", "nvidia.com/gpu")
ROLES = {"disagg-prefill": "kv_producer", "disagg-decode": "kv_consumer"}
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

Doc = dict[str, Any]


def manifest_files() -> list[Path]:
    """Every manifest, the monitoring/ ones included."""
    return sorted(K8S.rglob("*.yaml"))


def load_docs() -> list[Doc]:
    """Every YAML document of every manifest."""
    return [doc for path in manifest_files() for doc in yaml.safe_load_all(path.read_text())
            if doc is not None]


DOCS = load_docs()


def of_kind(kind: str) -> list[Doc]:
    """The documents of one kind."""
    return [d for d in DOCS if d["kind"] == kind]


def named(kind: str, name: str) -> Doc:
    """The one document of ``kind`` called ``name``."""
    found, = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return found


def container(deployment: Doc) -> Doc:
    """The deployment's only container."""
    only, = deployment["spec"]["template"]["spec"]["containers"]
    return only


def container_env(c: Doc) -> dict[str, str]:
    """What the container's environment holds, as the kubelet computes it (envFrom
    ConfigMaps first, then env; status.podIP as POD_IP; optional secrets left out)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        env.update(named("ConfigMap", source["configMapRef"]["name"])["data"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif var["valueFrom"].get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[var["name"]] = POD_IP
    return env


def expand(word: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` substitution in command and args."""
    return _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), word)


def argv(c: Doc, **overrides: str) -> list[str]:
    """command + args after substitution (``overrides`` replace environment values)."""
    env = {**container_env(c), **overrides}
    return [expand(word, env) for word in [*c["command"], *c.get("args", [])]]


def ports_by_name(c: Doc) -> dict[str, int]:
    """The container's named ports."""
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def pods_selected(service: Doc) -> list[Doc]:
    """The deployments whose pods the service's selector matches."""
    selector = service["spec"]["selector"].items()
    return [d for d in of_kind("Deployment")
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()]


def test_every_document_names_its_api_kind_and_itself() -> None:
    assert {d["kind"] for d in DOCS} == {"ConfigMap", "Deployment", "Service",
                                         "ServiceMonitor"}
    for doc in DOCS:
        assert doc["apiVersion"] and doc["metadata"]["name"], doc
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "disagg"
    keys = [(d["kind"], d["metadata"]["name"]) for d in DOCS]
    assert len(keys) == len(set(keys)), "two documents of one kind share a name"
    assert {d["metadata"]["name"] for d in of_kind("Deployment")} == {
        "disagg-prefill", "disagg-decode", "disagg-proxy"}


def test_deployment_selectors_match_their_pod_labels() -> None:
    for deployment in of_kind("Deployment"):
        assert deployment["apiVersion"] == "apps/v1"
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), deployment["metadata"]["name"]
    selectors = [tuple(sorted(d["spec"]["selector"]["matchLabels"].items()))
                 for d in of_kind("Deployment")]
    assert len(selectors) == len(set(selectors)), "two deployments would adopt each other's pods"


def test_every_service_selects_one_deployment_and_targets_a_declared_port() -> None:
    for service in of_kind("Service"):
        name = service["metadata"]["name"]
        deployments = pods_selected(service)
        assert len(deployments) == 1, name
        declared = ports_by_name(container(deployments[0]))
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert (target in declared if isinstance(target, str)
                    else target in declared.values()), f"{name} targets {target}"


@pytest.mark.parametrize("name", ["disagg-prefill", "disagg-decode", "disagg-proxy"])
def test_probes_hit_health_on_a_declared_port(name: str) -> None:
    c = container(named("Deployment", name))
    declared = ports_by_name(c)
    probes = {kind: c[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe",
                                                    "livenessProbe") if kind in c}
    assert {"readinessProbe", "livenessProbe"} <= probes.keys()
    for get in probes.values():
        assert get["port"] in declared and declared[get["port"]] == 8000
    assert probes["readinessProbe"]["path"] == "/health"
    if name == "disagg-proxy":
        # the proxy's /health is 503 while no instance is healthy: a readiness signal only;
        # its liveness must not restart it (and lose every registration) for that
        assert probes["livenessProbe"]["path"] == "/metrics"
    else:
        assert probes["startupProbe"]["path"] == probes["livenessProbe"]["path"] == "/health"


def test_instances_request_gpus_and_the_proxy_none() -> None:
    for name in ROLES:
        limits = container(named("Deployment", name))["resources"]["limits"]
        gpus = [limits[r] for r in GPU_RESOURCES if r in limits]
        assert gpus == [1], name
    resources = container(named("Deployment", "disagg-proxy"))["resources"]
    assert not any(r in resources.get(kind, {}) for r in GPU_RESOURCES
                   for kind in ("limits", "requests"))


def test_config_and_secret_references_resolve() -> None:
    config_maps = {d["metadata"]["name"] for d in of_kind("ConfigMap")}
    for deployment in of_kind("Deployment"):
        c = container(deployment)
        assert {s["configMapRef"]["name"] for s in c["envFrom"]} <= config_maps
        for var in c.get("env", []):
            secret = var.get("valueFrom", {}).get("secretKeyRef")
            # no Secret ships with the example: every reference must be optional
            assert secret is None or secret["optional"] is True, var["name"]
        unresolved = [w for w in argv(c) if "$(" in w]
        assert unresolved == [], f"{deployment['metadata']['name']}: undefined {unresolved}"


@pytest.mark.parametrize("name", list(ROLES))
def test_instance_args_are_valid_disagg_serve_flags(name: str) -> None:
    c = container(named("Deployment", name))
    words = argv(c)
    assert words[:2] == ["disagg", "serve"]
    args = build_parser().parse_args(words[1:])
    assert (args.host, args.port) == (POD_IP, ports_by_name(c)["http"])
    # the model directory only exists in the pod: check the rest on the built-in model
    cfg = engine_config_from_args(build_parser().parse_args(
        argv(c, MODEL="builtin:tiny-llama")[1:]))
    assert cfg.kv_transfer is not None
    assert cfg.kv_transfer.kv_role == ROLES[name]
    extra = cfg.kv_transfer.kv_connector_extra_config
    config = named("ConfigMap", "disagg-config")["data"]
    assert (extra["host"], extra["transport"], extra["mode"]) == (
        POD_IP, config["KV_TRANSPORT"], config["KV_MODE"])
    declared = ports_by_name(c)
    assert (declared["kv-handshake"], declared["kv-notify"]) == (extra["base_port"],
                                                                 extra["base_port"] + 1)
    assert args.served_model_name == [config["SERVED_MODEL_NAME"]]


@pytest.mark.parametrize("name", list(ROLES))
def test_instances_register_with_the_proxy_through_its_registration_service(
        name: str) -> None:
    address = build_parser().parse_args(argv(container(named("Deployment", name)))[1:])
    host, port = address.proxy_address.removeprefix("tcp://").split(":")
    service = named("Service", host)
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    proxy, = pods_selected(service)
    assert proxy["metadata"]["name"] == "disagg-proxy"
    # the proxy is ready only once instances registered: the Service must not wait for it
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_proxy_args_are_valid_disagg_proxy_flags() -> None:
    c = container(named("Deployment", "disagg-proxy"))
    words = argv(c)
    assert words[0] == "disagg-proxy"
    args = parse_proxy_args(words[1:])
    cfg = proxy_config(args)
    declared = ports_by_name(c)
    assert (cfg.host, cfg.port) == ("0.0.0.0", declared["http"])
    assert args.registration_address == f"tcp://0.0.0.0:{declared['registration']}"
    assert cfg.mode.value == named("ConfigMap", "disagg-config")["data"]["KV_MODE"]
    assert not args.launch and not args.prefill and not args.decode
    assert named("Deployment", "disagg-proxy")["spec"]["replicas"] == 1


def test_service_monitor_scrapes_metrics_of_proxy_and_instances() -> None:
    monitor, = of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    endpoint, = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    selector = monitor["spec"]["selector"]["matchLabels"].items()
    scraped = {s["metadata"]["name"] for s in of_kind("Service")
               if selector <= s["metadata"]["labels"].items()
               and endpoint["port"] in {p["name"] for p in s["spec"]["ports"]}}
    assert scraped == {"disagg-proxy", "disagg-prefill", "disagg-decode"}


@functools.cache
def _cluster_answers() -> bool:
    if shutil.which("kubectl") is None:
        return False
    proc = subprocess.run(["kubectl", "version", "--request-timeout=5s"], capture_output=True,
                          text=True, timeout=30)
    return proc.returncode == 0


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_kubectl_client_dry_run_accepts_the_manifest(path: Path) -> None:
    if not _cluster_answers():
        pytest.skip("kubectl is missing or reaches no API server (a client dry run needs one)")
    proc = subprocess.run(["kubectl", "apply", "--dry-run=client", "-f", str(path)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 and 'no matches for kind "ServiceMonitor"' in proc.stderr:
        pytest.skip("this cluster has no Prometheus Operator CRDs")
    assert proc.returncode == 0, proc.stderr


def test_manifests_match_the_kubernetes_schemas() -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate for the schema check")
    for doc in DOCS:
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: not in the Kubernetes schemas
        kubernetes_validate.validate(doc, "1.30", strict=True)
