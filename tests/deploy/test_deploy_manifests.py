"""The Kubernetes manifests as kubectl renders them: valid against the upstream schemas, and
consistent with the server they run (its settings' defaults, its health service, its drain)."""

from __future__ import annotations

import os
import re
from decimal import ROUND_CEILING, Decimal
from typing import Any

import kubernetes_validate
import pytest

from service.proto.vae.v1 import vae_pb2
from service.settings import DEFAULT_METRICS_PORT, DEFAULT_PORT, Settings

Manifest = dict[str, Any]

# The oldest Kubernetes these manifests target (the preStop `sleep` action is on by default
# from 1.30) and the newest whose schemas kubernetes-validate bundles. Pinned, so that a new
# kubernetes-validate release cannot change what "valid" means without a commit here.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# Custom resources: no upstream schema to validate against (checked by the policy tests).
CRD_KINDS = {"ServiceMonitor"}
HEALTH_SERVICE = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
NAMESPACE = "vae-serve"
CONTAINER_SECURITY = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
POD_SECURITY = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}


# ---- helpers ----


def setting_default(name: str) -> Any:
    """A Settings field's default, unaffected by VAE_* variables in the test's environment."""
    return Settings.model_fields[name].get_default(call_default_factory=True)


def only(objects: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = only(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def pod_labels(objects: list[Manifest]) -> dict[str, str]:
    labels: dict[str, str] = only(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def server(objects: list[Manifest]) -> dict[str, Any]:
    """The server container of the Deployment."""
    (container,) = [c for c in pod_spec(objects)["containers"] if c["name"] == "server"]
    return container


def all_containers(objects: list[Manifest]) -> list[dict[str, Any]]:
    spec = pod_spec(objects)
    return [*spec.get("initContainers", []), *spec["containers"]]


def config(objects: list[Manifest]) -> dict[str, str]:
    """The data of the ConfigMap(s) the server container reads through envFrom."""
    names = [ref["configMapRef"]["name"] for ref in server(objects).get("envFrom", [])]
    assert names, "the server reads no ConfigMap through envFrom"
    data: dict[str, str] = {}
    for name in names:
        data |= only(objects, "ConfigMap", name).get("data", {})
    return data


def container_port(objects: list[Manifest], name: str) -> int:
    (port,) = [p["containerPort"] for p in server(objects)["ports"] if p["name"] == name]
    assert isinstance(port, int)
    return port


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects `labels`."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        present = key in labels
        ok = {
            "In": present and labels.get(key) in (values or []),
            "NotIn": not present or labels.get(key) not in (values or []),
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]
        if not ok:
            return False
    return bool(selector.get("matchLabels") or selector.get("matchExpressions"))


def cpu_cores(quantity: str | int) -> Decimal:
    """A CPU quantity ("2", "1500m", 0.5) in cores."""
    text = str(quantity)
    return Decimal(text[:-1]) / 1000 if text.endswith("m") else Decimal(text)


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: container[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


def prestop_seconds(container: dict[str, Any]) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        seconds: int = pre_stop["sleep"]["seconds"]
        return seconds
    command = " ".join(pre_stop.get("exec", {}).get("command", []))
    match = re.search(r"\bsleep\s+(\d+)", command)
    return int(match.group(1)) if match else 0


# ---- rendering and schemas ----


def test_every_variant_renders_the_whole_application(objects: list[Manifest]) -> None:
    kinds = sorted(o["kind"] for o in objects)
    for kind in (
        "Namespace",
        "ServiceAccount",
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
    ):
        assert kind in kinds, f"no {kind} rendered"
    assert kinds.count("Service") == 2
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, f"{o['kind']} outside {NAMESPACE}"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_objects_are_valid_for_kubernetes(objects: list[Manifest], version: str) -> None:
    """Strict schemas: an unknown or misplaced field fails, not just a wrong type."""
    errors = []
    for o in objects:
        if o["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{o['kind']}/{o['metadata']['name']} {path}: {e.message}")
    assert not errors, "\n".join(errors)


def test_the_servicemonitor_component_scrapes_the_metrics_port(
    rendered: dict[str, list[Manifest]],
) -> None:
    objects = rendered["cpu+components"]
    monitor = only(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    scraped = [
        s
        for s in objects
        if s["kind"] == "Service" and selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    ]
    assert scraped, "the ServiceMonitor selects no Service"
    (endpoint,) = monitor["spec"]["endpoints"]
    with_port = [
        s for s in scraped if any(p["name"] == endpoint["port"] for p in s["spec"]["ports"])
    ]
    assert len(with_port) == 1, "exactly one Service should yield scrape targets"
    (port,) = [p for p in with_port[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    assert port["targetPort"] == "metrics"
    # It replaces the annotations, so that no Prometheus scrapes each pod twice.
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations")
    assert not any(k.startswith("prometheus.io/") for k in annotations or {})


# ---- the server's ports, health service and settings ----


def test_ports_are_the_settings_defaults(objects: list[Manifest]) -> None:
    assert container_port(objects, "grpc") == DEFAULT_PORT
    assert container_port(objects, "metrics") == DEFAULT_METRICS_PORT
    settings = config(objects)
    assert int(settings.get("VAE_PORT", DEFAULT_PORT)) == DEFAULT_PORT
    assert int(settings.get("VAE_METRICS_PORT", DEFAULT_METRICS_PORT)) == DEFAULT_METRICS_PORT


def test_probes_ask_grpc_health_on_the_grpc_port(objects: list[Manifest]) -> None:
    container = server(objects)
    found = probes(container)
    assert set(found) == {"startupProbe", "readinessProbe", "livenessProbe"}
    for kind, probe in found.items():
        # Kubernetes' grpc probe takes a port number, not a name: it must be the grpc port.
        assert probe["grpc"]["port"] == container_port(objects, "grpc"), kind
        assert probe["grpc"]["service"] == HEALTH_SERVICE, kind


def test_probe_timing_fits_startup_and_drain(objects: list[Manifest]) -> None:
    container = server(objects)
    found = probes(container)

    def window(probe: dict[str, Any]) -> int:
        return int(probe.get("periodSeconds", 10)) * int(probe.get("failureThreshold", 3))

    # Loading and warming up the model gets at least a minute before liveness takes over.
    assert window(found["startupProbe"]) >= 60
    # A draining pod answers NOT_SERVING: liveness must not kill it before the drain ends.
    # Without VAE_GRACE_PERIOD in the ConfigMap the server drains for its own default.
    grace = float(config(objects).get("VAE_GRACE_PERIOD", setting_default("grace_period")))
    drain = prestop_seconds(container) + grace
    assert window(found["livenessProbe"]) > drain
    # Readiness reacts faster than liveness.
    assert window(found["readinessProbe"]) < window(found["livenessProbe"])


def test_grace_period_outlasts_prestop_and_drain(objects: list[Manifest]) -> None:
    container = server(objects)
    grace = float(config(objects).get("VAE_GRACE_PERIOD", setting_default("grace_period")))
    pre_stop = prestop_seconds(container)
    assert pre_stop > 0, "no preStop sleep: SIGTERM could arrive before endpoints are removed"
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > pre_stop + grace


def test_config_holds_only_known_settings(objects: list[Manifest]) -> None:
    known = {f"VAE_{name.upper()}" for name in Settings.model_fields}
    unknown = set(config(objects)) - known
    assert not unknown, f"ConfigMap keys that no setting reads: {sorted(unknown)}"
    env = {e["name"] for e in server(objects).get("env", []) if e["name"].startswith("VAE_")}
    assert env <= known, f"env variables that no setting reads: {sorted(env - known)}"


def server_environment(objects: list[Manifest]) -> dict[str, str]:
    """The VAE_* variables the server container starts with: the ConfigMap, then `env` (the
    downward API's limits.cpu resolved as the kubelet does: rounded up to whole divisors)."""
    container = server(objects)
    environment = dict(config(objects))
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
            continue
        field = variable["valueFrom"]["resourceFieldRef"]
        bound, resource = field["resource"].split(".")  # e.g. limits.cpu
        assert resource == "cpu", f"{variable['name']}: only CPU fields are resolved here"
        quantity = container["resources"][bound][resource]
        cores = cpu_cores(quantity) / cpu_cores(field.get("divisor", "1"))
        environment[variable["name"]] = str(cores.to_integral_value(rounding=ROUND_CEILING))
    return {k: v for k, v in environment.items() if k.startswith("VAE_")}


def test_the_pods_environment_is_valid_settings(
    objects: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the server reads at start: every value parses, and together they pass the
    settings' own cross-checks (e.g. the queue fits the largest request)."""
    for name in [k for k in os.environ if k.startswith("VAE_")]:
        monkeypatch.delenv(name)
    environment = server_environment(objects)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert (settings.port, settings.metrics_port) == (DEFAULT_PORT, DEFAULT_METRICS_PORT)
    assert str(settings.model_repo) == "/models"
    assert settings.inference_workers * settings.intra_op_threads == cpu_cores(
        server(objects)["resources"]["limits"]["cpu"]
    )
    assert settings.tls_cert is None, "the kubelet's gRPC probes cannot speak TLS"


def test_only_a_mounted_model_is_polled_for_new_versions(objects: list[Manifest]) -> None:
    """A baked-in model never changes, so polling would be waste; a model volume gets new
    versions, which the pods load without a restart, from a read-only mount."""
    mounts = {m["mountPath"]: m for m in server(objects).get("volumeMounts", [])}
    interval = float(config(objects).get("VAE_RELOAD_INTERVAL", setting_default("reload_interval")))
    if "/models" in mounts:
        assert mounts["/models"].get("readOnly") is True
        assert 0 < interval <= 300
    else:
        assert interval == 0


def test_metrics_are_announced_for_scraping(objects: list[Manifest]) -> None:
    annotations = only(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations")
    if not annotations:
        assert any(o["kind"] == "ServiceMonitor" for o in objects), "nothing scrapes the pods"
        return
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == DEFAULT_METRICS_PORT
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def test_inference_threads_match_the_cpu_limit(objects: list[Manifest]) -> None:
    container = server(objects)
    limit = cpu_cores(container["resources"]["limits"]["cpu"])
    env = {e["name"]: e for e in container.get("env", [])}
    settings = config(objects)
    intra_op = int(settings.get("VAE_INTRA_OP_THREADS", setting_default("intra_op_threads")))
    workers_env = env.get("VAE_INFERENCE_WORKERS")
    if workers_env is not None and "valueFrom" in workers_env:
        # From the downward API: ceil(limit / divisor) workers; with divisor 1, one per CPU.
        field = workers_env["valueFrom"]["resourceFieldRef"]
        assert field["resource"] == "limits.cpu"
        assert cpu_cores(field.get("divisor", "1")) == 1
        assert field.get("containerName", container["name"]) == container["name"]
        workers = limit.to_integral_value(rounding=ROUND_CEILING)
    else:
        value = workers_env["value"] if workers_env else settings["VAE_INFERENCE_WORKERS"]
        workers = Decimal(value)
    assert workers * intra_op == limit, "ONNX Runtime threads should fill the CPU limit exactly"


# ---- selectors ----


def test_selectors_match_the_pod_labels(objects: list[Manifest]) -> None:
    labels = pod_labels(objects)
    deployment = only(objects, "Deployment")
    assert selects(deployment["spec"]["selector"], labels)
    for service in (o for o in objects if o["kind"] == "Service"):
        assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    assert selects(only(objects, "PodDisruptionBudget")["spec"]["selector"], labels)
    assert selects(only(objects, "NetworkPolicy")["spec"]["podSelector"], labels)
    for constraint in pod_spec(objects)["topologySpreadConstraints"]:
        assert selects(constraint["labelSelector"], labels)
    target = only(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])


def test_services_expose_grpc_by_cluster_ip_and_headless(objects: list[Manifest]) -> None:
    services = [o for o in objects if o["kind"] == "Service"]
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    cluster_ip = [s for s in services if s["spec"].get("clusterIP") != "None"]
    assert len(headless) == 1, "clients balancing per call (dns:/// round_robin) need one"
    assert len(cluster_ip) == 1
    assert cluster_ip[0]["spec"].get("type", "ClusterIP") == "ClusterIP"
    for service in services:
        grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        assert grpc, f"{service['metadata']['name']} has no grpc port"
        assert grpc[0]["port"] == DEFAULT_PORT
        assert grpc[0]["targetPort"] in ("grpc", DEFAULT_PORT)


# ---- resources and security ----


def test_every_container_has_requests_and_limits(objects: list[Manifest]) -> None:
    for container in all_containers(objects):
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert resource in resources.get(bound, {}), (
                    f"{container['name']}: {bound}.{resource}"
                )


def test_pod_and_containers_run_locked_down(objects: list[Manifest]) -> None:
    spec = pod_spec(objects)
    for key, value in POD_SECURITY.items():
        assert spec["securityContext"].get(key) == value, f"pod securityContext.{key}"
    assert spec["securityContext"].get("runAsUser", 1) != 0
    assert spec.get("automountServiceAccountToken") is False
    for container in all_containers(objects):
        context = container.get("securityContext", {})
        for key, value in CONTAINER_SECURITY.items():
            assert context.get(key) == value, f"{container['name']}: securityContext.{key}"
        assert context.get("runAsUser", 1) != 0
        assert not context.get("privileged", False)


def test_tmp_is_the_only_writable_path(objects: list[Manifest]) -> None:
    volumes = {v["name"]: v for v in pod_spec(objects).get("volumes", [])}
    for container in all_containers(objects):
        writable = [m for m in container.get("volumeMounts", []) if not m.get("readOnly")]
        assert [m["mountPath"] for m in writable] == ["/tmp"], container["name"]
        assert "emptyDir" in volumes[writable[0]["name"]]


# ---- rollouts, scaling, disruptions, network ----


def test_rollouts_never_drop_capacity(objects: list[Manifest]) -> None:
    deployment = only(objects, "Deployment")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_autoscaler_and_disruption_budget_keep_a_pod_serving(objects: list[Manifest]) -> None:
    hpa = only(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] >= 2
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    pdb = only(objects, "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable", 0) == 1 or pdb.get("minAvailable", 0) >= 1


def test_topology_spreads_pods_across_nodes(objects: list[Manifest]) -> None:
    keys = {c["topologyKey"] for c in pod_spec(objects)["topologySpreadConstraints"]}
    assert "kubernetes.io/hostname" in keys


def test_network_policy_opens_only_the_two_ports(objects: list[Manifest]) -> None:
    policy = only(objects, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress"]
    ports = {p["port"] for rule in policy["ingress"] for p in rule["ports"]}
    assert ports == {"grpc", "metrics"}
    peers = [peer for rule in policy["ingress"] for peer in rule["from"]]
    assert peers, "a rule without `from` admits everyone"
    client_peers = [p for p in peers if "podSelector" in p]
    monitoring = [
        p
        for p in peers
        if p.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
        == "monitoring"
    ]
    assert client_peers and all(p["podSelector"].get("matchLabels") for p in client_peers)
    assert monitoring
    for rule in policy["ingress"]:
        from_monitoring = all(p in monitoring for p in rule["from"])
        expected = {"metrics"} if from_monitoring else {"grpc"}
        assert {p["port"] for p in rule["ports"]} == expected


# ---- overlays ----


def test_gpu_overlay_asks_for_one_gpu_and_cuda(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["gpu"]
    container = server(objects)
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert config(objects)["VAE_PROVIDER"] == "cuda"
    spec = pod_spec(objects)
    assert spec.get("nodeSelector"), "GPU pods should land on GPU nodes"
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    assert container["image"].endswith("-gpu")


def test_cpu_overlay_stays_off_gpus(rendered: dict[str, list[Manifest]]) -> None:
    objects = rendered["cpu"]
    container = server(objects)
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert config(objects)["VAE_PROVIDER"] == "cpu"
    assert not container["image"].endswith("-gpu")
